# escape=`
FROM alpine AS custom
RUN echo `
  from custom file
